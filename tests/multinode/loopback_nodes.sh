#!/usr/bin/env bash
# Two "machines" on this one, for the two-node test: an sshd that answers on two loopback
# addresses, 127.0.0.1 and 127.0.0.2 (pdsh resolves host names itself, so they are addresses), keys made for it, and an `ssh` on PATH that knows
# them. Nothing outside DIR changes (the user's ~/.ssh is left alone) except, when they are
# missing and this runs as root, Debian's openssh-server and pdsh are installed.
#
#   bash tests/multinode/loopback_nodes.sh DIR      # start; prints the hostfile's path
#   bash tests/multinode/loopback_nodes.sh --stop DIR
#
# Then: PATH="DIR/bin:$PATH" rigtrain train ... --hostfile DIR/hostfile
# Exit code 3: sshd or pdsh is missing and cannot be installed here (not root, or no apt).
set -euo pipefail

if [ "${1:-}" = "--stop" ]; then
  dir=$2
  [ -f "$dir/sshd.pid" ] && kill "$(cat "$dir/sshd.pid")" 2>/dev/null || true
  exit 0
fi
dir=$(mkdir -p "$1" && cd "$1" && pwd)

sshd=$(command -v sshd || echo /usr/sbin/sshd)
if [ ! -x "$sshd" ] || ! command -v pdsh >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[nodes] installing openssh-server and pdsh (Debian packages)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server pdsh >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server pdsh >&2; }
    sshd=/usr/sbin/sshd
  else
    echo "loopback_nodes.sh: needs sshd (openssh-server) and pdsh; install them (apt-get install openssh-server pdsh) or run as root" >&2
    exit 3
  fi
fi

[ -f "$dir/host_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$dir/host_key"
[ -f "$dir/user_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$dir/user_key"
cp "$dir/user_key.pub" "$dir/authorized_keys"
chmod 600 "$dir/authorized_keys"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# privilege separation needs this directory when sshd starts as root
[ "$(id -u)" = 0 ] && mkdir -p /run/sshd

cat > "$dir/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PrintMotd no
CONF
cat > "$dir/ssh_config" <<CONF
Host 127.0.0.1 127.0.0.2
  Port $port
  IdentityFile $dir/user_key
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
CONF
# ssh reads the user's ~/.ssh/config from the password database, not $HOME, so a wrapper
# first on PATH is how DeepSpeed's launcher and pdsh (both run plain `ssh`) find these hosts.
mkdir -p "$dir/bin"
cat > "$dir/bin/ssh" <<CONF
#!/bin/sh
exec $(command -v ssh) -F $dir/ssh_config "\$@"
CONF
chmod +x "$dir/bin/ssh"
printf '127.0.0.1 slots=1\n127.0.0.2 slots=1\n' > "$dir/hostfile"

"$sshd" -f "$dir/sshd_config" -E "$dir/sshd.log"
for _ in $(seq 50); do
  if "$dir/bin/ssh" 127.0.0.2 true 2>/dev/null; then
    echo "$dir/hostfile"
    exit 0
  fi
  sleep 0.1
done
echo "loopback_nodes.sh: sshd on 127.0.0.1:$port did not answer; see $dir/sshd.log" >&2
exit 1
