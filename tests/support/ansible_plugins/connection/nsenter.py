"""Ansible connection into a booted container through nsenter on its init's PID (tests only).

Why not community.docker.nsenter: that collection is not part of ansible-core and is not
installed offline here; this is the same idea in a few lines.
"""

from __future__ import annotations

import subprocess

from ansible.errors import AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: nsenter
short_description: Run tasks in a container's namespaces with nsenter (p2p-mirror tests)
description:
  - Enters every namespace of the container's init process and runs the command there.
author: p2p-mirror tests
options:
  remote_addr:
    description: PID of the container's init process, as the controller sees it.
    vars:
      - name: ansible_host
extends_documentation_fragment:
  - connection_pipelining
"""

CLEAN_ENV = ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
             "LANG=C.UTF-8"]


class Connection(ConnectionBase):
    transport = "nsenter"
    has_pipelining = True

    def _connect(self) -> Connection:
        self._connected = True
        return self

    def _argv(self, *command: str) -> list[str]:
        pid = str(self.get_option("remote_addr") or self._play_context.remote_addr)
        if not pid.isdigit():
            raise AnsibleError(f"nsenter connection: ansible_host must be a PID, got {pid!r}")
        return ["nsenter", "-t", pid, "-a", "--", *CLEAN_ENV, *command]

    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        proc = subprocess.run(self._argv("/bin/sh", "-c", cmd), input=in_data or b"",
                              capture_output=True, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as src:
            proc = subprocess.run(self._argv("/bin/sh", "-c", 'cat > "$1"', "sh", out_path),
                                  stdin=src, capture_output=True, check=False)
        if proc.returncode != 0:
            raise AnsibleError(f"put_file {out_path}: {proc.stderr.decode(errors='replace')}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as dst:
            proc = subprocess.run(self._argv("cat", "--", in_path), stdout=dst,
                                  stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            raise AnsibleError(f"fetch_file {in_path}: {proc.stderr.decode(errors='replace')}")

    def close(self) -> None:
        self._connected = False
