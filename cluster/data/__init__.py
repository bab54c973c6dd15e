"""Ray Data: document sources (files, FineWeb-Edu, the built-in corpus) read and tokenized into token shards."""
