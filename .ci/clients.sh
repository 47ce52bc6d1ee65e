#!/usr/bin/env bash
# Third-party Realtime clients for tests/clients/: each in its own virtual environment (or npm
# prefix) under .clients/ (gitignored), so their pins never meet ours. Re-running is cheap: an
# environment whose stamp matches its requirement line is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
root=.clients
mkdir -p "$root"

python_client() {  # name, then pip requirements
    local name=$1; shift
    local dir="$root/$name" want="$*"
    if [[ -f "$dir/stamp" && "$(cat "$dir/stamp")" == "$want" ]]; then return; fi
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
    echo "$want" >"$dir/stamp"
}

node_client() {  # name, then npm packages
    local name=$1; shift
    local dir="$root/$name" want="$*"
    if [[ -f "$dir/stamp" && "$(cat "$dir/stamp")" == "$want" ]]; then return; fi
    rm -rf "$dir"
    mkdir -p "$dir"
    npm install --silent --no-audit --no-fund --prefix "$dir" "$@"
    echo "$want" >"$dir/stamp"
}

python_client pipecat "pipecat-ai[openai]==1.14.0" &
python_client livekit "livekit-agents==1.8.9" "livekit-plugins-openai==1.8.9" &
node_client agents-js "@openai/agents-realtime@0.20.0" "ws@8" &
for job in $(jobs -p); do wait "$job"; done
