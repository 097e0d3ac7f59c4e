# Source on the lent GPU machine after shared/device/tensorrt86 has been staged there:
#   . scripts/gpu_kit_env.sh
# Python 3.11 with TensorRT 8.6 comes from the kit; the project's own dependencies travel as cp311
# wheels in .whl/ (carried); OpenCV is the machine's own abi3 build, linked in.
. /root/trt86/env.sh
site=/tmp/imgworker-site311
if [ ! -f $site/.ready ]; then
  mkdir -p $site
  for wheel in .whl/*.whl; do python3.11 -m zipfile -e "$wheel" $site; done
  cv2_dir=$(python3 -c 'import cv2, os; print(os.path.dirname(cv2.__file__))')
  ln -sfn "$cv2_dir" $site/cv2
  for libs in "$(dirname "$cv2_dir")"/opencv_python*.libs; do [ -d "$libs" ] && ln -sfn "$libs" $site/; done
  mkdir -p $site/bin  # wheels' scripts (py-spy) lose their mode in a zip extraction
  for tool in $site/*.data/scripts/*; do [ -f "$tool" ] && chmod +x "$tool" && ln -sf "$tool" $site/bin/; done
  touch $site/.ready
fi
export PATH=$site/bin:$PATH
export PYTHONPATH=$site:$PWD
export IMGWORKER_ASSETS_DIR=$PWD/.assets
export IMGWORKER_BACKEND__TENSORRT__PLAN_DIR=/tmp/imgworker-plans
export IMGWORKER_BACKEND__TENSORRT__TACTIC_SOURCES='["EDGE_MASK_CONVOLUTIONS","JIT_CONVOLUTIONS"]'
export IMGWORKER_BACKEND__TENSORRT__OPTIMIZATION_LEVEL=${IMGWORKER_BACKEND__TENSORRT__OPTIMIZATION_LEVEL:-2}
alias python=python3.11
