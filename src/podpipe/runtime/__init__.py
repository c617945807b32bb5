"""The runtime layer: processes, sockets, files. It carries out the engine's actions."""
