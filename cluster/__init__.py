"""The entrance: YAML → frozen config, Ray start/connect, actor placement, the `pdserve` CLI."""
