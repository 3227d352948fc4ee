#!/usr/bin/env bash
# Adds a pass-through mknod for sockets and FIFOs to a LazyFS built by
# ../shared/tools/lazyfs/build.sh (usage: lazyfs-sockets.sh BUILD_DIR), and
# rebuilds it. LazyFS has no mknod, so bind(2) on it fails with ENOSYS:
# relayq serve (which makes its control and pickup sockets in the spool, and
# refuses to start without them) could not run on it. Sockets and FIFOs
# hold no data, so nothing about LazyFS's caching changes.
set -euo pipefail
SRC=${1:?usage: lazyfs-sockets.sh BUILD_DIR}
python3 - "$SRC/lazyfs" <<'PATCH'
import sys
d = sys.argv[1]
h = d + "/include/lazyfs/lazyfs.hpp"; s = open(h).read()
if "lfs_mknod (const char* path" in s:
    sys.exit(0)
anchor = "    static int lfs_link (const char* from, const char* to);\n"
assert anchor in s
s = s.replace(anchor, anchor + "\n    static int lfs_mknod (const char* path, mode_t mode, dev_t rdev);\n")
open(h, "w").write(s)
c = d + "/src/lazyfs.cpp"; s = open(c).read()
tail = "} // namespace lazyfs"
assert s.rstrip().endswith(tail)
i = s.rstrip().rfind(tail)
s = s[:i] + """int LazyFS::lfs_mknod (const char* path, mode_t mode, dev_t rdev) {
    // relayq addition: sockets and FIFOs (no data to cache) pass through
    if (!S_ISSOCK (mode) && !S_ISFIFO (mode))
        return -EPERM;
    if (mknod (path, mode, rdev) == -1)
        return -errno;
    return 0;
}

""" + s[i:]
open(c, "w").write(s)
PATCH
cmake --build "$SRC/lazyfs/build" -j2 >/dev/null
echo "LazyFS at $SRC/lazyfs/build/lazyfs makes sockets"
