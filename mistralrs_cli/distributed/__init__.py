"""Tensor parallelism (--tp N) on torch.distributed: shard.py and tp_layers.py split a loaded
model by Hugging Face module name, comm.py joins the ranks and watches them, step.py carries
rank 0's engine steps to the others, launch.py puts it together for the loader."""
