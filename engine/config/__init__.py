"""TODO"""
from vidpo.config.loader import (
                                 REPO_ROOT,
                                 ConfigError,
                                 check_keys,
                                 explain,
                                 field_docs,
                                 load_config,
                                 resolve_path,
                                 to_dict,
                                 to_yaml,
                                 validate_choices,
)
from vidpo.config.sections import *  # noqa: F401,F403
