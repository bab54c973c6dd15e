"""The end-to-end workflow: the jobs of `cluster` and the Serve application of `serving` composed into one pipeline.

It sits above both packages, so neither imports the other's caller (see README.md, "Layout").
"""
