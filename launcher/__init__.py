"""The supervisor side of streampipe: config, spawning, the control socket, the CLI."""
