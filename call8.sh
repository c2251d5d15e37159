export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
timeout -k 10 330 python -m scaledown.evaluation.bench --shape mistral-7b --compressor modernbert-base --engine static --compile --encoder_attn_implementation flex_attention --decode_attention_kernel auto --batch_sizes 32,max --max_batch_size 512 --repeats 3 --warmup 1 --output_dir $OUT > $OUT/bench_auto_decode.txt 2>&1
echo "bench rc=$?"; grep -v "^/\|warn\|^$" $OUT/bench_auto_decode.txt | tail -14
