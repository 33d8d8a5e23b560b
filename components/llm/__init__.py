"""Language models (CausalLM protocol) and the regression head."""
from components.llm.llama import LlamaLM
from components.llm.regression_head import RegressionHead

__all__ = ["LlamaLM", "RegressionHead"]
