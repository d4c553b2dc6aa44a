"""Networks of the two seed papers (IMRS 3D-ResNeXt+CE, MAT-EffNet) as plain nn.Modules."""
