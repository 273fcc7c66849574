# `make install` / `make uninstall` for Linux; included by the top-level
# Makefile, the work is done by etc/install.sh (see its header).
#
#   make install                               PREFIX=/usr/local, real install
#   make install DESTDIR=/tmp/stage PREFIX=/usr    staged, for packaging
#   make uninstall [same variables]            removes what install recorded
#
# fssd and its dependencies go into a private venv, $(LIBDIR)/venv; nothing
# goes into the system python. NO_PY=1 installs only the unit, udev rule,
# config and man pages. After a real install:
#   systemctl daemon-reload && udevadm control --reload && systemctl enable --now fssd

# Included first, this must not make `install` the top-level default goal.
FSSD_SAVED_GOAL := $(.DEFAULT_GOAL)

PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= /lib/systemd/system
UDEVDIR ?= /lib/udev/rules.d
SBINDIR ?= $(PREFIX)/sbin
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
LIBDIR ?= $(PREFIX)/lib/fssd
PYTHON ?= python3
NO_PY ?=
PIP_FLAGS ?=

# Where this fragment lives, whatever directory make runs in (:= so it is
# taken now, while it is still the last makefile read).
FSSD_ETCDIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
FSSD_SRCDIR := $(abspath $(FSSD_ETCDIR)/..)
FSSD_CONFIG ?= $(FSSD_ETCDIR)/fssd.toml

FSSD_INSTALL_ENV = PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" SYSCONFDIR="$(SYSCONFDIR)" \
	UNITDIR="$(UNITDIR)" UDEVDIR="$(UDEVDIR)" SBINDIR="$(SBINDIR)" BINDIR="$(BINDIR)" \
	MANDIR="$(MANDIR)" LIBDIR="$(LIBDIR)" PYTHON="$(PYTHON)" NO_PY="$(NO_PY)" \
	PIP_FLAGS="$(PIP_FLAGS)" SRCDIR="$(FSSD_SRCDIR)" CONFIG="$(abspath $(FSSD_CONFIG))"

.PHONY: install uninstall

install:
	@$(FSSD_INSTALL_ENV) sh "$(FSSD_ETCDIR)/install.sh" install

uninstall:
	@$(FSSD_INSTALL_ENV) sh "$(FSSD_ETCDIR)/install.sh" uninstall

# Give the default goal back (empty: the next target the includer defines).
.DEFAULT_GOAL := $(FSSD_SAVED_GOAL)
