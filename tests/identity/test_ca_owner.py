"""CA state is its user's alone: a directory or key another user owns (who could read
the keys or put in their own), or a slot directory others can enter, is refused."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from tests.unit.localaccess import NOBODY, as_other_user, requires_root
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.store import StoreError

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def test_a_slot_directory_others_can_enter_is_refused(tmp_path: Path) -> None:
    root = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW).store.root
    slot = next((root / "slots").iterdir())
    os.chmod(slot, 0o755)
    with pytest.raises(StoreError, match=f"{slot} is mode 755; it must be 0700"):
        CertificateAuthority.load(root)


@requires_root
@pytest.mark.parametrize("what", ["ca", "slots/*", "token-key.pem", "slots/*/ca-key.pem"])
def test_ca_state_owned_by_another_user_is_refused(tmp_path: Path, what: str) -> None:
    root = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW).store.root
    target = root if what == "ca" else next(root.glob(what))
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(StoreError, match=f"{target} belongs to uid {NOBODY}, not to the CA's"):
        CertificateAuthority.load(root)


@requires_root
def test_another_user_can_neither_list_the_ca_nor_read_its_keys(tmp_path: Path) -> None:
    root = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW).store.root
    keys = [root / "token-key.pem", *root.glob("slots/*/ca-key.pem")]
    # O_PATH descriptors opened as root reach past tmp_path: each refusal is the CA's own.
    fds = [os.open(root, os.O_PATH | os.O_DIRECTORY), *(os.open(k, os.O_PATH) for k in keys)]

    def attempts() -> list[str]:
        seen = []
        for index, fd in enumerate(fds):
            try:
                if index == 0:
                    os.listdir(f"/proc/self/fd/{fd}")
                else:
                    Path(f"/proc/self/fd/{fd}").read_bytes()
                seen.append("allowed")
            except PermissionError:
                seen.append("EACCES")
        return seen

    try:
        assert as_other_user(attempts) == ["EACCES"] * (1 + len(keys))
    finally:
        for fd in fds:
            os.close(fd)
