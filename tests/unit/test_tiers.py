"""The node tier's copier: whole, checked copies or none, and a full disk is not fatal."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import xxhash

from podpipe.model.output import Output
from podpipe.runtime.storage.tiers import NodeTier, path_for, verified


def _output(tmp_path: Path, size: int) -> tuple[Path, str]:
    data = bytes(range(256)) * (size // 256)
    path = tmp_path / "scratch.arrow"
    path.write_bytes(data)
    return path, xxhash.xxh3_64(data).hexdigest()


def test_a_copy_is_whole_fsynced_and_reported_even_if_the_output_is_deleted_meanwhile(tmp_path):
    source, checksum = _output(tmp_path, 1 << 20)
    tier = NodeTier(tmp_path / "run")
    tier.submit(Output("double", 3, str(source), 1 << 20, 10, checksum),
                str(path_for(tmp_path / "run", "double", 3)))
    source.unlink()  # the engine deleted it from RAM: the copy still completes
    tier.close()
    (copy,) = tier.finished()
    assert copy.path == str(path_for(tmp_path / "run", "double", 3)) and copy.tier == "node"
    assert verified(copy.path, checksum)
    assert not list((tmp_path / "run" / "node" / "double").glob(".*"))  # no temp left


def test_a_copy_whose_checksum_differs_is_not_kept(tmp_path):
    source, _ = _output(tmp_path, 4096)
    tier = NodeTier(tmp_path / "run")
    tier.submit(Output("double", 0, str(source), 4096, 1, "0" * 16),
                str(path_for(tmp_path / "run", "double", 0)))
    tier.close()
    assert tier.finished() == []
    assert "checksum differs" in tier.errors[0]
    assert not path_for(tmp_path / "run", "double", 0).exists()


def test_a_full_disk_is_reported_and_leaves_no_partial_file(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail (EFBIG), as they
    would with ENOSPC."""
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        from pathlib import Path
        import xxhash
        from podpipe.model.output import Output
        from podpipe.runtime.storage.tiers import NodeTier, path_for
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        data = bytes(4 << 20)
        source = Path({str(tmp_path)!r}) / "big.arrow"
        source.write_bytes(data)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        tier = NodeTier(Path({str(tmp_path)!r}) / "run")
        run = Path({str(tmp_path)!r}) / "run"
        tier.submit(Output("double", 0, str(source), len(data), 1,
                           xxhash.xxh3_64(data).hexdigest()), str(path_for(run, "double", 0)))
        tier.close()
        print(json.dumps({{"errors": tier.errors, "made": len(tier.finished())}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["made"] == 0 and "cannot copy to the node tier" in result["errors"][0]
    assert [p for p in (tmp_path / "run" / "node").rglob("*") if p.is_file()] == []
