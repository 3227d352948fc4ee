#!/bin/sh
# Installs relayq as a systemd service:
#   - the binary:        $PREFIX/bin/relayq                (0755)
#   - symlinks:          /usr/sbin/sendmail, /usr/bin/mailq -> $PREFIX/bin/relayq
#   - the user:          relayq (system user, no login, no home)
#   - the spool:         /var/spool/relayq                 (0711, owned by relayq)
#     and its maildrop:  /var/spool/relayq/maildrop        (1733: any user's sendmail drops mail);
#     it and the queue directories are made by `relayq queue init`, run as relayq
#   - the config:        /etc/relayq/relayq.toml           (0644: every user's sendmail reads it;
#                        secrets go in password_file, readable by relayq only; never overwritten)
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
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
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

# The spool: private to relayq, except the maildrop, where `sendmail` run
# by any user (PHP's mail() as www-data, cron jobs) leaves mail, even
# before the daemon first starts (it makes the same modes at every start).
# What is inside the spool is the relayq user's to replace (with a link to
# /etc, say), and this script runs as root at every upgrade: it never
# follows what is in there. The maildrop is made by relayq itself (queue
# init, below); only a staging (--destdir), with no relayq user, makes it
# here.
install -d -m 0755 "$root/var/spool"
install -d -m 0711 "$root/var/spool/relayq"
chmod 0711 "$root/var/spool/relayq"
maildrop="$root/var/spool/relayq/maildrop"
if [ -L "$maildrop" ]; then
    echo "install.sh: $maildrop is a symbolic link, not relayq's maildrop (the relayq user may have put it there): not following it; see where it points, remove it, and run install.sh again" >&2
    exit 1
fi
if [ -z "$destdir" ]; then
    chown relayq:relayq "$root/var/spool/relayq"
    say "spool /var/spool/relayq (0711); relayq makes its maildrop (1733) below"
else
    install -d -m 1733 "$maildrop"
    chmod 1733 "$maildrop"
    say "spool /var/spool/relayq (0711) with its maildrop (1733)"
fi

# The config: readable by every user, because `sendmail` reads it as the
# user who runs it; secrets live in files only relayq reads (password_file,
# mode 0600, owned by relayq). Never overwrite what an operator wrote.
install -d -m 0755 "$root/etc/relayq"
config="$root/etc/relayq/relayq.toml"
if [ -e "$config" ]; then
    say "kept the existing /etc/relayq/relayq.toml"
    # Others' read bit: the 8th character of "-rw-r--r--".
    if [ "$(stat -c %A "$config" | cut -c8)" != r ]; then
        say "warning: /etc/relayq/relayq.toml is not readable by other users, so their sendmail fails (exit 78); move any secret into password_file, then: chmod 644 /etc/relayq/relayq.toml"
    fi
else
    # Like Postfix's main.cf: readable by all.
    install -m 0644 "$here/relayq.toml" "$config"
    say "installed /etc/relayq/relayq.toml from dist/relayq.toml: edit [relay] before starting"
fi

# The queue's directories, made by relayq itself as its user (as the
# Debian package's postinst does): root's sendmail (cron's mail) and mailq
# then find the spool complete and relayq's before the daemon first
# starts, and never create its directories as root.
if [ -z "$destdir" ]; then
    runuser -u relayq -- "$bin" queue init --config /etc/relayq/relayq.toml ||
        say "warning: could not prepare the spool (see above); 'relayq serve' prepares it when it starts"
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
sed "s|/usr/bin/relayq|$bin|g" "$here/relayq.service" >"$root/etc/systemd/system/relayq.service"
chmod 0644 "$root/etc/systemd/system/relayq.service"
say "installed /etc/systemd/system/relayq.service"
if [ -z "$destdir" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

cat <<EOF
install.sh: done. Next:
  1. edit /etc/relayq/relayq.toml ([relay] host, port, tls, username, password_file);
     the password goes in its own file, readable by relayq only:
     (umask 077; printf '%s' 'the password' > /etc/relayq/relay-password); chown relayq: /etc/relayq/relay-password
  2. check it as the service runs relayq (user relayq, CAP_NET_BIND_SERVICE for port 25):
     sudo setpriv --reuid=relayq --regid=relayq --init-groups --inh-caps=+net_bind_service --ambient-caps=+net_bind_service $bin check --config /etc/relayq/relayq.toml --send-to you@example.com
  3. systemctl enable --now relayq && journalctl -u relayq -f
EOF
