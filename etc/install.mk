# `make install` / `make uninstall` for Linux; included by the top-level
# Makefile. Everything goes under $(DESTDIR), so packagers can stage it:
#   make install DESTDIR=/tmp/stage PREFIX=/usr
# NO_PY=1 installs only the files below, not the Python package (tests, or
# packagers who build the wheel themselves).
#
# After a real install (empty DESTDIR):
#   systemctl daemon-reload && udevadm control --reload && systemctl enable --now fssd

# Included first, this must not make `install` the top-level default goal.
FSSD_SAVED_GOAL := $(.DEFAULT_GOAL)

PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= /lib/systemd/system
UDEVDIR ?= /lib/udev/rules.d
PYTHON ?= python3
NO_PY ?=
PIP_FLAGS ?=

# Where this fragment lives, whatever directory make runs in (:= so it is
# taken now, while it is still the last makefile read).
FSSD_ETCDIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
FSSD_SRCDIR := $(FSSD_ETCDIR)/..
FSSD_CONFIG ?= $(FSSD_ETCDIR)/fssd.toml

.PHONY: install uninstall

install:
	install -d "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(UDEVDIR)" "$(DESTDIR)$(SYSCONFDIR)/fssd"
	sed -e 's|^ExecStart=/usr/bin/fssd |ExecStart=$(PREFIX)/bin/fssd |' \
	    -e 's| -c /etc/fssd/fssd.toml| -c $(SYSCONFDIR)/fssd/fssd.toml|' \
	    "$(FSSD_ETCDIR)/systemd/fssd.service" > "$(DESTDIR)$(UNITDIR)/fssd.service.tmp"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/fssd.service.tmp"
	mv "$(DESTDIR)$(UNITDIR)/fssd.service.tmp" "$(DESTDIR)$(UNITDIR)/fssd.service"
	install -m 0644 "$(FSSD_ETCDIR)/udev/90-fssd.rules" "$(DESTDIR)$(UDEVDIR)/90-fssd.rules"
	@# The configuration is the administrator's: never overwrite it.
	@if [ -e "$(DESTDIR)$(SYSCONFDIR)/fssd/fssd.toml" ]; then \
	    echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/fssd/fssd.toml"; \
	else \
	    echo "install -m 0644 $(FSSD_CONFIG) $(DESTDIR)$(SYSCONFDIR)/fssd/fssd.toml"; \
	    install -m 0644 "$(FSSD_CONFIG)" "$(DESTDIR)$(SYSCONFDIR)/fssd/fssd.toml"; \
	fi
ifeq ($(NO_PY),)
	@# --root keeps the layout of PREFIX under DESTDIR; --ignore-installed
	@# puts the dependencies in PREFIX even if the build environment has them.
	$(PYTHON) -m pip install --no-warn-script-location --ignore-installed \
	    --prefix "$(PREFIX)" $(if $(DESTDIR),--root "$(DESTDIR)") $(PIP_FLAGS) "$(FSSD_SRCDIR)"
endif

# Leaves $(SYSCONFDIR)/fssd/fssd.toml (the administrator's) and the
# dependencies (possibly shared) in place; removes fssd's own files by the
# RECORD pip wrote.
uninstall:
	rm -f "$(DESTDIR)$(UNITDIR)/fssd.service" "$(DESTDIR)$(UDEVDIR)/90-fssd.rules"
ifeq ($(NO_PY),)
	@for rec in "$(DESTDIR)$(PREFIX)"/lib/python3*/*-packages/fssd-*.dist-info/RECORD; do \
	    [ -f "$$rec" ] || continue; \
	    sp=$${rec%/fssd-*.dist-info/RECORD}; \
	    echo "removing fssd from $$sp"; \
	    (cd "$$sp" && cut -d, -f1 "$$rec" | while read -r f; do rm -f "./$$f"; done); \
	    rm -rf "$${rec%/RECORD}"; \
	    for d in daemon workers ipc; do \
	        find "$$sp/$$d" -depth -type d -empty -delete 2>/dev/null || true; \
	    done; \
	done
endif

# Give the default goal back (empty: the next target the includer defines).
.DEFAULT_GOAL := $(FSSD_SAVED_GOAL)
