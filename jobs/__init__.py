"""The command-line jobs. Each module is a script (`python jobs/pretrain.py`, `ray job submit -- python jobs/...`)
and an installed command (`gpt2-pretrain`, see pyproject.toml's [project.scripts]); both call its `main`."""
