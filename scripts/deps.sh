# Sourced by scripts/test and scripts/bench: installs the Debian packages fovea's build
# needs when any is missing (as root, or through sudo).
fovea_packages=(cmake make g++ libeigen3-dev libxsimd-dev libgtest-dev libbenchmark-dev)

ensure_packages() {
  local missing=()
  for p in "${fovea_packages[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "Installing missing packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  local log
  log=$(mktemp)
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"; } > "$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
