# Sourced by the benchmarks: the model and training flags of fairseq's single-node MoE
# reference command (24 layers, d 2048, ffn 8192, 32 heads, 8 experts every 2nd layer,
# top-2 'all', 2048 tokens per sample, batch 4), without precision, ddp backend and
# update-freq, which each benchmark sets.
reference_model=(--task dummy_lm --tokens-per-sample 2048
  --arch transformer_lm_gpt --share-decoder-input-output-embed
  --decoder-layers 24 --decoder-embed-dim 2048 --decoder-ffn-embed-dim 8192 --decoder-attention-heads 32
  --moe-expert-count 8 --moe-freq 2 --moe-gating-use-fp32 --moe-second-expert-policy all
  --moe-normalize-expert-grad sqrt_world_size --moe-eval-capacity-token-fraction -1.0
  --max-sentences-valid 1 --num-workers-valid 0
  --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0
  --lr 0.0005 --warmup-updates 750 --dropout 0.1 --attention-dropout 0.1
  --batch-size 4 --disable-validation --no-save --log-format json --log-interval 10)
