#!/bin/sh
# Installs relayq as a systemd service:
#   - the binary:        $PREFIX/bin/relayq                (0755)
#   - symlinks:          /usr/sbin/sendmail, /usr/bin/mailq -> $PREFIX/bin/relayq
#   - the user:          relayq (system user, no login, no home)
#   - the spool:         /var/spool/relayq                 (0700, owned by relayq)
#   - the config:        /etc/relayq/relayq.toml           (0640 root:relayq; never overwritten)
#   - the unit:          /etc/systemd/system/relayq.service
# It does not start anything: edit the config, run `relayq check`, then
# `systemctl enable --now relayq`.
#
# Usage: dist/install.sh [--destdir DIR] [--prefix DIR] [--binary FILE] [--force-links]
#   --destdir DIR    install under DIR instead of / (for packaging and tests);
#                    no user is created, nothing is chowned, systemd is not told
#   --prefix DIR     where bin/relayq goes (default /usr/local)
#   --binary FILE    the relayq binary (default target/release/relayq)
#   --force-links    replace an existing sendmail/mailq that is not relayq's
#                    (e.g. Postfix's); without it they are left alone
set -eu

here=$(cd "$(dirname "$0")" && pwd)
destdir=""
prefix=/usr/local
binary="$here/../target/release/relayq"
force_links=no

while [ $# -gt 0 ]; do
    case "$1" in
        --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --binary) binary=${2:?--binary needs a file}; shift 2 ;;
        --force-links) force_links=yes; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;;
esac
if [ ! -x "$binary" ]; then
    echo "install.sh: no relayq binary at $binary; build it with: cargo build --release" >&2
    exit 1
fi
if [ -z "$destdir" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or use --destdir DIR to stage the files)" >&2
    exit 1
fi

root="$destdir"
bin="$prefix/bin/relayq"
say() { echo "install.sh: $*"; }

install -d -m 0755 "$root$prefix/bin"
install -m 0755 "$binary" "$root$bin"
say "installed $bin"

# The user the daemon runs as.
if [ -z "$destdir" ]; then
    if ! getent passwd relayq >/dev/null; then
        nologin=$(command -v nologin || echo /usr/sbin/nologin)
        useradd --system --user-group --home-dir /var/spool/relayq --no-create-home \
            --shell "$nologin" --comment "relayq mail relay" relayq
        say "created the system user relayq"
    fi
else
    say "--destdir given: not creating the user relayq (the package's postinst should)"
fi

# The spool: private to relayq.
install -d -m 0755 "$root/var/spool"
install -d -m 0700 "$root/var/spool/relayq"
chmod 0700 "$root/var/spool/relayq"
if [ -z "$destdir" ]; then
    chown relayq:relayq "$root/var/spool/relayq"
fi
say "spool /var/spool/relayq (0700)"

# The config: never overwrite what an operator wrote.
install -d -m 0755 "$root/etc/relayq"
if [ -e "$root/etc/relayq/relayq.toml" ]; then
    say "kept the existing /etc/relayq/relayq.toml"
else
    install -m 0640 "$here/relayq.toml" "$root/etc/relayq/relayq.toml"
    if [ -z "$destdir" ]; then
        chgrp relayq "$root/etc/relayq/relayq.toml"
    fi
    say "installed /etc/relayq/relayq.toml from dist/relayq.toml: edit [relay] before starting"
fi

# sendmail and mailq, where applications look for them.
link() {
    target="$root$1"
    install -d -m 0755 "$(dirname "$target")"
    if [ -L "$target" ] && [ "$(readlink "$target")" = "$bin" ]; then
        return
    fi
    if [ -e "$target" ] || [ -L "$target" ]; then
        if [ "$force_links" != yes ]; then
            say "left $1 alone: it belongs to another program (remove that MTA, or rerun with --force-links)"
            return
        fi
        rm -f "$target"
    fi
    ln -s "$bin" "$target"
    say "linked $1 -> $bin"
}
link /usr/sbin/sendmail
link /usr/bin/mailq

# The service, with this prefix's paths.
install -d -m 0755 "$root/etc/systemd/system"
sed "s|/usr/local/bin/relayq|$bin|g" "$here/relayq.service" >"$root/etc/systemd/system/relayq.service"
chmod 0644 "$root/etc/systemd/system/relayq.service"
say "installed /etc/systemd/system/relayq.service"
if [ -z "$destdir" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

cat <<EOF
install.sh: done. Next:
  1. edit /etc/relayq/relayq.toml ([relay] host, port, tls, username, password_file)
  2. check it as the service runs relayq (user relayq, CAP_NET_BIND_SERVICE for port 25):
     sudo setpriv --reuid=relayq --regid=relayq --init-groups --inh-caps=+net_bind_service --ambient-caps=+net_bind_service $bin check --config /etc/relayq/relayq.toml --send-to you@example.com
  3. systemctl enable --now relayq && journalctl -u relayq -f
EOF
