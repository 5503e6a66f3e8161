"""PyTorch files written next to exported models that no PyTorch library defines (seed contrastive models), for
`transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)`. Not imported by the JAX package."""
