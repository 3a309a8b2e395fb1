"""How a step is executed: `base.py` is the loop's interface, `build.py` picks the implementation (`native.py`:
one process / DDP; `deepspeed.py`: ZeRO 1-3), `ds_config.py` generates DeepSpeed's config from the run. Importing
this package loads nothing: the engines are imported by whoever builds one."""
