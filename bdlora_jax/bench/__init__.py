"""`python -m bdlora_jax.bench <subcommand>`: measurements printed side by side (JSON with --json).

One module per subcommand (comm, serve, step, demo-accuracy, kernel, lower, ablate, compress, cost), registered in
bdlora_jax.bench.cli.SUBCOMMANDS; common.py holds the options and helpers they share. Model, device and
ablation configs resolve from any working directory: a path that exists is used as is, and a bare NAME or a
configs/<kind>/NAME.yaml path is the config of that name shipped in bdlora_jax/configs.
"""
