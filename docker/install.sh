#!/bin/sh
# alloc-moe-install PIP WHEELHOUSE TORCH_INDEX REQUIREMENT...
# Installs the requirements (in order, one pip call each, so torch is settled before the project) with PIP.
# A wheelhouse holding wheels means an offline install: --no-index --find-links WHEELHOUSE. Otherwise the index is
# used, and a non-empty TORCH_INDEX is the index torch comes from (the CPU build).
set -eu
pip=$1 wheels=$2 torch_index=$3
shift 3
offline=no
for f in "$wheels"/*.whl; do
    [ -e "$f" ] && offline=yes
    break
done
for req in "$@"; do
    if [ "$offline" = yes ]; then
        "$pip" install --no-index --find-links "$wheels" "$req"
    else
        index=""
        case "$req" in
            torch==*) [ -n "$torch_index" ] && index="--index-url $torch_index" ;;
        esac
        # shellcheck disable=SC2086  # $index is empty or two words
        "$pip" install $index "$req"
    fi
done
echo "alloc-moe-install: offline=$offline"
