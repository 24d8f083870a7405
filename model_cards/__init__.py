"""Model-card templates (Jinja, rendered by ``huggingface_hub.ModelCard.from_template``), installed as the data
package ``onestep_pipelines.model_cards``."""

import os

TEMPLATES_DIR = os.path.dirname(os.path.abspath(__file__))
