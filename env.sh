# Source me: `source env.sh` (bash or zsh), from any directory.
# Puts the shell into the project's environment: the .venv from `make setup`, the built ROS interfaces in
# install/, and this source tree first on PYTHONPATH (so edits to .py files need no rebuild).
if [ -n "${BASH_SOURCE:-}" ]; then _psr_src="${BASH_SOURCE[0]}"; elif [ -n "${ZSH_VERSION:-}" ]; then _psr_src="${(%):-%x}"; else _psr_src="$0"; fi
PIXEL_SAIL_ROOT="$(cd "$(dirname "$_psr_src")" && pwd)"
export PIXEL_SAIL_ROOT
unset _psr_src
if [ ! -x "$PIXEL_SAIL_ROOT/.venv/bin/python" ]; then
  echo "env.sh: no .venv in $PIXEL_SAIL_ROOT: run 'make setup' first" >&2
  return 1 2>/dev/null || exit 1
fi
export VIRTUAL_ENV="$PIXEL_SAIL_ROOT/.venv"
_psr_pyver="$("$VIRTUAL_ENV/bin/python" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')"
_psr_site="$PIXEL_SAIL_ROOT/install/lib/$_psr_pyver/site-packages"
case ":${PATH}:" in *":$VIRTUAL_ENV/bin:"*) ;; *) PATH="$VIRTUAL_ENV/bin:$PATH" ;; esac
case ":${PATH}:" in *":$PIXEL_SAIL_ROOT/install/lib/pixel_sail_ros:"*) ;; *) PATH="$PIXEL_SAIL_ROOT/install/lib/pixel_sail_ros:$PATH" ;; esac
export PATH
case ":${PYTHONPATH:-}:" in *":$_psr_site:"*) ;; *) PYTHONPATH="$PIXEL_SAIL_ROOT:$_psr_site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
export PYTHONPATH
# No RPATH in the generated type-support libraries: the loader must find them before python starts.
case ":${LD_LIBRARY_PATH:-}:" in *":$PIXEL_SAIL_ROOT/install/lib:"*) ;; *) LD_LIBRARY_PATH="$PIXEL_SAIL_ROOT/install/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
export LD_LIBRARY_PATH
case ":${AMENT_PREFIX_PATH:-}:" in *":$PIXEL_SAIL_ROOT/install:"*) ;; *) AMENT_PREFIX_PATH="$PIXEL_SAIL_ROOT/install:$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}" ;; esac
export AMENT_PREFIX_PATH
# Camera-sized messages need a bigger Fast DDS shared-memory segment (see config/fastdds_large_frames.xml).
if [ -z "${FASTDDS_DEFAULT_PROFILES_FILE:-}" ]; then export FASTDDS_DEFAULT_PROFILES_FILE="$PIXEL_SAIL_ROOT/config/fastdds_large_frames.xml"; fi
unset _psr_pyver _psr_site
