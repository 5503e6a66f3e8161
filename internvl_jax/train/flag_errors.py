"""Command-line mistakes as one line: absl / ml_collections flag errors (an unknown --config.field, a config file
that raises, a bad flag value) print `error: ...` naming the flag and the fix, instead of a traceback and absl's
FATAL banner. `--verbose` keeps the full traceback.

  app.run(main, flags_parser=flag_errors.parser(FLAGS))
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys

from absl import flags


def _last_line(text: str) -> str:
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else str(text)


def _config_of(argv: list[str], config_flag: str):
  """The ConfigDict that --config=FILE[:ARG] names, loaded the way ml_collections does (get_config(ARG)), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{config_flag}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{config_flag}" and i + 1 < len(argv):
      value = argv[i + 1]
  if not value:
    return None
  path, _, config_arg = value.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_config_for_errors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if config_arg else module.get_config()
  except Exception:  # the config file's own error is reported instead
    return None


def _unknown_override(argv: list[str], config_flag: str) -> str | None:
  """'--config.a.b: ...' for the first --config.* override naming no field of the config, or None."""
  config = _config_of(argv, config_flag)
  if config is None:
    return None
  prefix = f"--{config_flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split("=", 1)[0]
    node, walked = config, []
    for key in path.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        near = difflib.get_close_matches(key, keys, n=1)
        where = f"config.{'.'.join(walked)}" if walked else "the config"
        hint = f"did you mean --{config_flag}.{'.'.join(walked + [near[0]])}?" if near else \
            f"its fields: {', '.join(sorted(map(str, keys))[:12])}"
        return f"--{config_flag}.{path}: {where} has no field {key!r}; {hint}"
      node, walked = node[key], walked + [key]
  return None


def describe(error: BaseException, flag_values, argv: list[str], config_flag: str = "config") -> str:
  """One line for an error raised while parsing the command line."""
  text = str(error)
  if "Error whilst parsing config file" in text:  # the config file raised: its own last line is the message
    head = text.split(": Error whilst parsing config file")[0]
    last = _last_line(text)
    message = last.split(": ", 1)[1] if re.match(r"^[A-Za-z_.]*(Error|Exception): ", last) else last
    return f"{head}: {message}"
  unknown = _unknown_override(argv, config_flag)
  if unknown:
    return unknown
  return _last_line(text)


def parser(flag_values):
  """A flags_parser for absl.app.run that turns parse errors into `error: ...` and exit status 2."""
  def parse(argv):
    try:
      return flag_values(argv)
    except Exception as e:  # absl / ml_collections raise many types while parsing (flags.Error, AttributeError, ...)
      if "--verbose" in argv or "--verbose=true" in argv:
        raise
      print(f"error: {describe(e, flag_values, list(argv))}", file=sys.stderr, flush=True)
      sys.exit(2)
  return parse
