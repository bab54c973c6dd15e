"""Run configs: YAML files and `section.key=value` overrides resolved onto dataclasses (`loading`), the sections
that several jobs share (`sections`), and one config per job (`pretrain`, `finetune`, `distill`, `early_exit`)."""

from cluster.config.loading import (
    ConfigError,
    add_output_options,
    build,
    check_counts,
    check_name,
    config_for_job,
    default_output,
    flatten,
    job_parser,
    load,
    output_file,
    output_folder,
    parse_override,
    plain_name,
    to_dict,
)

__all__ = ["ConfigError", "add_output_options", "build", "check_counts", "check_name", "config_for_job",
           "default_output", "flatten", "job_parser", "load", "output_file", "output_folder", "parse_override",
           "plain_name", "to_dict"]
