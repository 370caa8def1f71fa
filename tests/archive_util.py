"""Build small .tar.gz archives in memory (data-loader tests: good archives, and unsafe members/links)."""
from __future__ import annotations

import io
import tarfile


def tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None, dirs: tuple[str, ...] = ()) -> bytes:
    """A gzip tarball of directory entries ``dirs``, files ``members`` (name → bytes) and symlinks ``links``
    (name → target), in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in dirs:
            ti = tarfile.TarInfo(d.rstrip("/"))
            ti.type = tarfile.DIRTYPE
            tar.addfile(ti)
        for name, blob in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tar.addfile(ti, io.BytesIO(blob))
        for name, target in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tar.addfile(ti)
    return buf.getvalue()
