"""The toy world: a procedural picture world where every judge can be checked, on a CPU.

- `comfusion.toy.world`: the renderer (captioned pictures, instances) and two exact judges
  (`scene_of`, `instance_distance`) that no training sees;
- `comfusion.toy.pretrain`: pretrains the committed `toy` base model on the world;
- `comfusion.toy.judges`: trains the toy judges (a CLIP and a DINO-role instance encoder),
  those the fusion losses use (`toy`) and held-out ones that only score (`toy-heldout`).

They build their models with the public helpers of `comfusion.models`, so the toy models
have SD 1.5's component types and load by name like any other model.
"""
