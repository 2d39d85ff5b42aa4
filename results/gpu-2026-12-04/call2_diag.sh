#!/usr/bin/env bash
# Diagnosis of the first GPU call's failures: BCQ, BEAR and SVG(none) runs, and the GPU tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MUJOCO_GL=disable
D=runs/reproduce/cpu/datasets/cheetah.npz
common="--env cheetah --dataset $D --total-steps 600 --batch-size 512 --eval-every 300 --checkpoint-every 300 --eval-episodes 1"
run() { name=$1; shift; timeout 130 python3 "$@" $common --run-dir /tmp/r_$name > /tmp/$name.txt 2>&1; echo "exit $?" >> /tmp/$name.txt;
        grep -v settotalmass /tmp/$name.txt | tail -40 > $OUT/$name.txt; cp /tmp/r_$name/metrics.csv $OUT/$name.metrics.csv 2>/dev/null; }
run bcq bcq.py &
run bear bear.py --divergence kl --warmup-steps 40 &
run svgnone abm_svg.py --prior none &
(ABM_TEST_DEVICE=cuda timeout 140 python3 -m pytest -q -p no:cacheprovider -rfE --tb=line -n 5 --timeout 120 tests/test_end_to_end.py tests/test_mechanism.py tests/test_gpu_path.py > $OUT/tests.txt 2>&1; echo "exit $?" >> $OUT/tests.txt) &
(TORCHDYNAMO_DISABLE=1 ABM_TEST_DEVICE=cuda timeout 140 python3 -m pytest -q -p no:cacheprovider -rfE --tb=line -n 5 --timeout 120 tests/test_end_to_end.py tests/test_mechanism.py > $OUT/tests_eager.txt 2>&1; echo "exit $?" >> $OUT/tests_eager.txt) &
wait
tail -c 2500 $OUT/tests.txt; echo "== eager"; tail -c 1500 $OUT/tests_eager.txt; for f in bcq bear svgnone; do echo "== $f"; tail -12 $OUT/$f.txt | cut -c1-300; done
