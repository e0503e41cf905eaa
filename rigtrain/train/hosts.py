"""Several machines (`--hostfile`): the hostfile read as DeepSpeed's launcher reads it, and
each machine checked before anything starts, so that a missing pdsh or a host that asks
for a password is one line naming the host, not a traceback from inside the launcher.

What a user sets up is in README.md, "Several machines": the same paths on every machine
(the repository, its virtual environment, the data, and the run folder on a shared
filesystem), passwordless ssh from this machine to each, and pdsh here."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from rigtrain.errors import UserError

SSH_TIMEOUT_S = 10


def read_hostfile(hostfile: str) -> dict[str, int]:
    """{host: slots} in the file's order, parsed by DeepSpeed's own launcher code so that
    both agree on every line."""
    from deepspeed.launcher.runner import fetch_hostfile  # DeepSpeed: only for a multi-machine run

    if not Path(hostfile).is_file():
        raise UserError(f"--hostfile {hostfile}: no such file; list one 'HOST slots=N' line per machine")
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)  # it logs the whole file before raising; our line says it better
    try:
        hosts = fetch_hostfile(hostfile)
    except ValueError as err:
        raise UserError(f"--hostfile {hostfile}: {err}; write one 'HOST slots=N' line per machine") from None
    finally:
        ds_logger.setLevel(level)
    if any(slots < 1 for slots in hosts.values()):
        raise UserError(f"--hostfile {hostfile}: every host needs slots=1 or more (one process per slot)")
    return dict(hosts)


def check_hosts(hostfile: str, hosts: dict[str, int]) -> None:
    """pdsh here and passwordless ssh to every host, as the launcher will use them."""
    if len(hosts) > 1 and shutil.which("pdsh") is None:
        raise UserError(
            f"--hostfile {hostfile}: DeepSpeed's launcher starts the other machines with pdsh, which is not "
            "installed here (Debian/Ubuntu: apt-get install pdsh)"
        )
    for host in hosts:
        try:
            answer = subprocess.run(
                ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host, "true"],
                capture_output=True,
                text=True,
                timeout=SSH_TIMEOUT_S + 5,
            )
        except FileNotFoundError:
            raise UserError(f"--hostfile {hostfile}: no ssh client here (apt-get install openssh-client)") from None
        except subprocess.TimeoutExpired:
            answer = None
        if answer is None or answer.returncode != 0:
            said = (answer.stderr.strip().splitlines() or [""])[-1] if answer else "timed out"
            raise UserError(
                f"--hostfile {hostfile}: cannot ssh to {host} without a password ({said}); set up a key "
                f"(ssh-keygen, then ssh-copy-id {host}) and check that `ssh {host} true` works"
            )
