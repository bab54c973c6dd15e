"""Ray and MLflow glue for the gpt2 package."""
