"""A run's configuration: the dataclasses with each key's one-line meaning and their validation in
one place (`schema`), `key=value` overrides typed and checked (`overrides`), TOML/JSON config files
read and written (`configfile`), and the named runs resolved preset < file < overrides (`presets`).
Nothing here imports torch, so `--help`, `--version` and `presets` stay fast."""
