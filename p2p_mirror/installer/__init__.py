"""Node installer: point containerd (hosts.toml) or dockerd (daemon.json) at the local mirror.

``install`` journals every original file before changing it, restarts the runtime, checks it
answers, and rolls back on failure; ``uninstall`` restores the originals byte for byte.
"""
