"""A container's view of the pod, for the kubelet emulation in test_kubernetes.py:
run inside a new mount namespace (`unshare --mount`), it builds the container's root
and execs its command there.

The root is the machine's own filesystem (standing in for the image: the Python and
podpipe installed here) under an overlay whose writes go to a folder of the
container's own, remounted read-only as `readOnlyRootFilesystem: true` has it; the
pod's volumes are bind-mounted at their mount paths only (read-only where the
manifest says so), the image's WORKDIR `/app` too; then it changes root, goes to the
container's working directory and execs its command with its env.

    python contain.py CONFIG   (JSON: root, mounts [[path, host dir, read-only]],
                                workdir, argv, env)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def main() -> None:
    config = json.loads(sys.argv[1])
    base = config["root"]
    root, upper, work = (os.path.join(base, part) for part in ("root", "upper", "work"))
    for folder in (root, upper, work):
        os.makedirs(folder, exist_ok=True)
    mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}",
          root)
    for system in ("/proc", "/sys", "/dev"):
        mount("--rbind", system, root + system)
    for path, host, read_only in sorted(config["mounts"], key=lambda m: m[0].count("/")):
        target = root + path
        os.makedirs(target, exist_ok=True)  # (in the overlay: the host's root is untouched)
        mount("--bind", host, target)
        if read_only:
            mount("-o", "remount,bind,ro", target)
    mount("-o", "remount,bind,ro", root)  # the root filesystem, not the volumes on it
    os.chroot(root)
    os.chdir(config["workdir"])
    os.execvpe(config["argv"][0], config["argv"], config["env"])


if __name__ == "__main__":
    main()
