"""Evaluation on Ray (HellaSwag, perplexity), the compression comparisons, attention-head analysis, and the plots
the jobs write."""
