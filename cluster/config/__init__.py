"""Run configs: YAML files and `section.key=value` overrides resolved onto dataclasses (`loading`), the sections
that several jobs share (`sections`), and one config per job (`pretrain`, `finetune`, `distill`, `early_exit`)."""

from cluster.config.loading import (
    ConfigError,
    build,
    config_for_job,
    flatten,
    job_parser,
    load,
    output_file,
    output_folder,
    parse_override,
    to_dict,
)

__all__ = ["ConfigError", "build", "config_for_job", "flatten", "job_parser", "load", "output_file", "output_folder",
           "parse_override", "to_dict"]
