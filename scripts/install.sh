#!/usr/bin/env bash
# Install rlhf and its MLOps stack into ./.venv (or the active virtualenv).
#
# torch goes first, and its build is chosen deliberately: a bare `torch` requirement with
# nothing installed pulls a multi-GB CUDA build on Linux. RLHF_TORCH picks it (default auto):
#   auto  torch already importable: kept as it is. Otherwise, with no NVIDIA GPU (nvidia-smi
#         lists none; without nvidia-smi, no /dev/nvidia0) the CPU build, as for `cpu`; with
#         one, the CUDA build, as for `cuda`.
#   cpu   torch==2.13.0 from PyTorch's CPU wheel index (RLHF_TORCH_CPU_INDEX, default
#         https://download.pytorch.org/whl/cpu). If that index does not answer within 5 s,
#         pip's default index instead: on machines whose pip is configured with a local wheel
#         folder holding the CPU wheel, that is the CPU build; elsewhere on Linux it is the
#         CUDA build (the script then warns). Off Linux, PyPI's torch is a CPU build already:
#         the default index.
#   cuda  torch 2.13.0 from pip's default index, exactly that version (`===`, so a local
#         `+cpu` wheel does not shadow it): the CUDA build on Linux. RLHF_TORCH_CUDA_INDEX
#         takes it from another index instead, e.g. https://download.pytorch.org/whl/cu130.
#   skip  no torch step (if none is installed, the package's own torch requirement then
#         pulls pip's default build).
# With `cpu` or `cuda`, an installed torch of the other build is uninstalled and replaced.
# One line says which build was chosen and why. `install.sh --print-choice` prints that line
# and exits without installing anything (nor creating .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PIN=2.13.0
CPU_INDEX=${RLHF_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
CUDA_INDEX=${RLHF_TORCH_CUDA_INDEX:-}

mode=install
case "${1:-}" in
  "") ;;
  --print-choice) mode=print ;;
  *) echo "usage: $0 [--print-choice]" >&2; exit 2 ;;
esac

# Sets gpu_why; true when an NVIDIA GPU is present.
gpu_present() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    local n
    n=$( { if command -v timeout >/dev/null 2>&1; then timeout 20 nvidia-smi -L; else nvidia-smi -L; fi; } \
         2>/dev/null | grep -c '^GPU [0-9]' || true)
    if [ "${n:-0}" -gt 0 ]; then gpu_why="nvidia-smi lists $n GPU(s)"; return 0; fi
    gpu_why="nvidia-smi lists no GPU"; return 1
  fi
  if [ -e /dev/nvidia0 ]; then gpu_why="/dev/nvidia0 exists (no nvidia-smi)"; return 0; fi
  gpu_why="no nvidia-smi, no /dev/nvidia0"; return 1
}

# True when the package index $1 answers for torch within 5 s (DNS included).
index_answers() {
  python - "$1" >/dev/null 2>&1 <<'EOF'
import os, signal, sys, urllib.parse, urllib.request
url = sys.argv[1].rstrip("/") + "/torch/"
if url.startswith("file:"):
    sys.exit(0 if os.path.exists(urllib.request.url2pathname(urllib.parse.urlparse(url).path)) else 1)
if hasattr(signal, "SIGALRM"):
    signal.alarm(6)  # the socket timeout does not cover name resolution
with urllib.request.urlopen(url, timeout=5) as response:
    response.read(1)
EOF
}

# The packages are installed by uv: it resolves as pip does and installs in parallel, a fresh
# install in ~15 s where pip took ~95. Python compiles and caches each module's bytecode at its
# first import; where PYTHONDONTWRITEBYTECODE is set nothing is cached, so every process would
# compile torch and the rest anew: there uv compiles it all at install (~30 s), as pip does.
# uv reads no pip configuration, so the pip settings that say where packages come from (a local
# wheel folder, mirror indexes, constraints, a CA bundle; pip.conf or PIP_* variables, the
# first setting of each kind as pip takes it) are passed on.
# Sets uv_settings and default_index.
uv_settings_from_pip() {
  local key value item seen=" "
  uv_settings=(--python "$(command -v python)" --index-strategy unsafe-best-match)
  default_index=https://pypi.org/simple
  while IFS='=' read -r key value; do
    key=${key##*.} value=${value#\'} value=${value%\'}
    case "$seen" in *" $key "*) continue ;; esac
    seen="$seen$key "
    case "$key" in
      index-url) default_index=$value ;;
      extra-index-url) for item in $value; do uv_settings+=(--extra-index-url "$item"); done ;;
      find-links) for item in $value; do uv_settings+=(--find-links "$item"); done ;;
      constraint) for item in $value; do uv_settings+=(--constraint "$item"); done ;;
      cert) export SSL_CERT_FILE=${SSL_CERT_FILE:-$value} ;;
    esac
  done < <(python -m pip config list 2>/dev/null)
}

uv_pip_install() {
  python -m uv pip install -q ${PYTHONDONTWRITEBYTECODE:+--compile-bytecode} "${uv_settings[@]}" "$@"
}

build_name() { case "$1" in cpu) echo CPU ;; cuda) echo CUDA ;; rocm) echo ROCm ;; *) echo "$1" ;; esac; }

# Sets torch_action (keep|skip|install|replace), torch_want (cpu|cuda), torch_index (empty:
# pip's default index), torch_spec and torch_line (what was chosen and why).
choose_torch() {
  local choice=${RLHF_TORCH:-auto} installed="" version="" build="" why="" from
  torch_action=install torch_want="" torch_index="" torch_spec="torch==$TORCH_PIN"
  case "$choice" in
    auto|cpu|cuda|skip) ;;
    *) echo "install.sh: RLHF_TORCH=$choice: use auto, cpu, cuda or skip" >&2; exit 2 ;;
  esac
  if [ "$choice" = skip ]; then
    torch_action=skip torch_line="not installed (RLHF_TORCH=skip)"; return
  fi
  installed=$(python -c 'import torch
print(torch.__version__, "cuda" if torch.version.cuda else "rocm" if getattr(torch.version, "hip", None) else "cpu")' \
              2>/dev/null) || installed=""
  version=${installed% *} build=${installed#* }
  if [ "$choice" = auto ]; then
    if [ -n "$installed" ]; then
      torch_action=keep
      torch_line="keeping the installed torch $version, a $(build_name "$build") build (already importable; RLHF_TORCH=cpu|cuda replaces it)"
      return
    fi
    if gpu_present; then torch_want=cuda; else torch_want=cpu; fi
    why=$gpu_why
  else
    torch_want=$choice why="RLHF_TORCH=$choice"
    if [ -n "$installed" ]; then
      if [ "$build" = "$choice" ]; then
        torch_action=keep
        torch_line="keeping the installed torch $version, already a $(build_name "$build") build ($why)"
        return
      fi
      torch_action=replace why="$why; replacing the installed torch $version, a $(build_name "$build") build"
    fi
  fi
  if [ "$torch_want" = cuda ]; then
    if [ -n "$CUDA_INDEX" ]; then
      torch_index=$CUDA_INDEX
    else
      torch_spec="torch===$TORCH_PIN"
    fi
  elif [ "$(uname -s)" != Linux ]; then
    why="$why; PyPI's torch for $(uname -s) is a CPU build"
  elif index_answers "$CPU_INDEX"; then
    torch_index=$CPU_INDEX
  else
    why="$why; $CPU_INDEX did not answer within 5 s"
  fi
  from=${torch_index:-"pip's default index"}
  torch_line="the $(build_name "$torch_want") build, $torch_spec from $from ($why)"
}

install_torch() {
  case "$torch_action" in keep|skip) return ;; esac
  if [ "$torch_action" = replace ]; then
    python -m uv pip uninstall -q --python "$(command -v python)" torch
  fi
  uv_pip_install --index-url "${torch_index:-$default_index}" "$torch_spec" || {
    echo "install.sh: installing $torch_spec failed; RLHF_TORCH=cpu|cuda|skip picks the build" \
         "(or install torch yourself first)" >&2
    exit 1
  }
  local got
  got=$(python -c 'import torch; print(torch.__version__, "cuda" if torch.version.cuda else "cpu")' 2>/dev/null)
  if [ "${got#* }" != "$torch_want" ]; then
    echo "install.sh: warning: wanted the $(build_name "$torch_want") build of torch but got" \
         "torch ${got% *}, a $(build_name "${got#* }") build; RLHF_TORCH_CPU_INDEX or" \
         "RLHF_TORCH_CUDA_INDEX names another index" >&2
  fi
}

if [ "$mode" = print ] && [ -z "${VIRTUAL_ENV:-}" ] && [ ! -d .venv ]; then
  python() { python3 "$@"; }  # no virtualenv yet: --print-choice creates none
else
  . scripts/_venv.sh
fi
choose_torch
echo "install.sh: torch: $torch_line"
[ "$mode" = print ] && exit 0

python -m pip install -q uv
uv_settings_from_pip
install_torch
uv_pip_install --index-url "$default_index" -e ".[mlops${RLHF_EXTRAS:+,$RLHF_EXTRAS}]"
