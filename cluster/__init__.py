"""Ray and MLflow glue for the gpt2 package."""

import os

# Ray heads started by this project use token authentication (see cluster/local_services.py). Ray reads this setting
# when it is imported, so it is set here, before any module of this package imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
