#!/bin/sh
# fssd install / uninstall, run by etc/install.mk (`make install`, `make uninstall`).
#
# Everything lands under $DESTDIR (empty for a real install). Python: fssd and
# its dependencies go into a private virtual environment $LIBDIR/venv, never
# into the system python; the console scripts are linked into $SBINDIR (fssd,
# fssconfig, vssadm) and $BINDIR (appvss, an application anyone may run).
#
# A venv records its own absolute path (script shebangs, activate, pyvenv.cfg).
# With DESTDIR empty it is built where it will run. With DESTDIR set it is
# built in the staging tree and then relocated: every mention of the staging
# path is rewritten to the final one and the byte code is compiled with the
# final paths, so the staged tree works once copied to /.
#
# install writes $LIBDIR/install-manifest: every file, link and directory it
# created (directories only if they did not exist, and not when staged under
# DESTDIR). uninstall removes exactly those, the configuration only if it is
# unchanged since install.
set -eu

: "${PREFIX:=/usr/local}" "${DESTDIR:=}" "${SYSCONFDIR:=/etc}"
: "${UNITDIR:=/lib/systemd/system}" "${UDEVDIR:=/lib/udev/rules.d}"
: "${SBINDIR:=$PREFIX/sbin}" "${BINDIR:=$PREFIX/bin}" "${MANDIR:=$PREFIX/share/man}"
: "${LIBDIR:=$PREFIX/lib/fssd}" "${PYTHON:=python3}" "${PIP_FLAGS:=}" "${NO_PY:=}"
: "${SRCDIR:?}" "${CONFIG:=$SRCDIR/etc/fssd.toml}"

VENV="$LIBDIR/venv"
MANIFEST="$LIBDIR/install-manifest"
SBIN_TOOLS="fssd fssconfig vssadm"
BIN_TOOLS="appvss"
NEW_MANIFEST=""

say() { echo "$*"; }
record() { NEW_MANIFEST="$NEW_MANIFEST$*
"; }

# install -d, recording each directory level this creates.
mkdirs() {
	d="$1"
	missing=""
	while [ "$d" != / ] && [ ! -d "$DESTDIR$d" ]; do
		missing="$d $missing"
		d=$(dirname "$d")
	done
	for m in $missing; do
		install -d -m 0755 "$DESTDIR$m"
		# Staged: which directories the target system lacks is the package manager's business.
		[ -n "$DESTDIR" ] || record "d $m"
	done
}

put() { # mode source destination
	mkdirs "$(dirname "$3")"
	install -m "$1" "$2" "$DESTDIR$3.tmp.$$"
	mv -f "$DESTDIR$3.tmp.$$" "$DESTDIR$3"
	record "f $3"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

do_install() {
	# Directories a previous install created are still ours to remove.
	if [ -f "$DESTDIR$MANIFEST" ]; then
		NEW_MANIFEST=$(grep '^[dc] ' "$DESTDIR$MANIFEST" || true)
		[ -z "$NEW_MANIFEST" ] || NEW_MANIFEST="$NEW_MANIFEST
"
	fi
	[ -z "$DESTDIR" ] || install -d "$DESTDIR"
	mkdirs "$LIBDIR"

	# The unit runs the fssd this install provides, on the config it installs.
	mkdirs "$UNITDIR"
	sed -e "s|^ExecStart=[^ ]*/fssd |ExecStart=$SBINDIR/fssd |" \
	    -e "s| -c /etc/fssd/fssd.toml| -c $SYSCONFDIR/fssd/fssd.toml|" \
	    "$SRCDIR/etc/systemd/fssd.service" > "$DESTDIR$UNITDIR/fssd.service.tmp.$$"
	chmod 0644 "$DESTDIR$UNITDIR/fssd.service.tmp.$$"
	mv -f "$DESTDIR$UNITDIR/fssd.service.tmp.$$" "$DESTDIR$UNITDIR/fssd.service"
	record "f $UNITDIR/fssd.service"
	put 0644 "$SRCDIR/etc/udev/90-fssd.rules" "$UDEVDIR/90-fssd.rules"

	# The configuration is the administrator's: never overwritten.
	conf="$SYSCONFDIR/fssd/fssd.toml"
	mkdirs "$SYSCONFDIR/fssd"
	if [ -e "$DESTDIR$conf" ]; then
		say "keeping existing $DESTDIR$conf"
	else
		say "install -m 0644 $CONFIG $DESTDIR$conf"
		install -m 0644 "$CONFIG" "$DESTDIR$conf"
		record "c $(sha "$DESTDIR$conf") $conf"
	fi

	for page in "$SRCDIR"/man/*.[1-9]; do
		[ -f "$page" ] || continue
		sect=${page##*.}
		put 0644 "$page" "$MANDIR/man$sect/$(basename "$page")"
	done

	if [ -z "$NO_PY" ]; then
		install_python
	fi

	printf '%s' "$NEW_MANIFEST" | sort -u > "$DESTDIR$MANIFEST.tmp.$$"
	mv -f "$DESTDIR$MANIFEST.tmp.$$" "$DESTDIR$MANIFEST"
	say "installed; manifest $DESTDIR$MANIFEST"
}

install_python() {
	stage="$DESTDIR$VENV"
	rm -rf "$stage"
	say "creating the virtual environment $stage"
	if ! "$PYTHON" -m venv "$stage"; then
		echo "install.sh: $PYTHON -m venv failed (Debian: apt-get install python3-venv)" >&2
		exit 1
	fi
	record "t $VENV"
	# --no-compile: byte code is compiled below, with the paths it will run from.
	# shellcheck disable=SC2086
	"$stage/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile $PIP_FLAGS "$SRCDIR"
	if [ -n "$DESTDIR" ]; then
		# Relocate: the venv will run at $VENV, not in the staging tree.
		grep -rlI --null -F "$stage" "$stage" 2>/dev/null | xargs -0 -r sed -i "s|$stage|$VENV|g"
		"$stage/bin/python" -m compileall -q -f -s "$DESTDIR" -p / "$stage/lib" >/dev/null
	else
		"$stage/bin/python" -m compileall -q "$stage/lib" >/dev/null
	fi
	for t in $SBIN_TOOLS; do link "$VENV/bin/$t" "$SBINDIR/$t"; done
	for t in $BIN_TOOLS; do link "$VENV/bin/$t" "$BINDIR/$t"; done
}

link() { # target name
	mkdirs "$(dirname "$2")"
	ln -sfn "$1" "$DESTDIR$2"
	record "l $2"
}

do_uninstall() {
	if [ ! -f "$DESTDIR$MANIFEST" ]; then
		say "fssd is not installed here: no $DESTDIR$MANIFEST"
		return 0
	fi
	# Files, links and trees first, then directories deepest first.
	while read -r kind a b; do
		case "$kind" in
		f | l) rm -f "$DESTDIR$a" ;;
		t) rm -rf "$DESTDIR$a" ;;
		c)
			if [ -f "$DESTDIR$b" ] && [ "$(sha "$DESTDIR$b")" = "$a" ]; then
				rm -f "$DESTDIR$b"
			elif [ -e "$DESTDIR$b" ]; then
				say "keeping $DESTDIR$b: changed since it was installed"
			fi
			;;
		esac
	done < "$DESTDIR$MANIFEST"
	dirs=$(sed -n 's/^d //p' "$DESTDIR$MANIFEST" | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-)
	rm -f "$DESTDIR$MANIFEST"
	# Only directories install created, and only if nothing else is in them now.
	printf '%s\n' "$dirs" | while read -r d; do
		[ -n "$d" ] && rmdir "$DESTDIR$d" 2>/dev/null || true
	done
	say "uninstalled"
}

case "${1:-}" in
install) do_install ;;
uninstall) do_uninstall ;;
*) echo "usage: install.sh install|uninstall" >&2; exit 2 ;;
esac
