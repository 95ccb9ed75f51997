"""An OpenAI-compatible gateway for a hybrid fleet of local, remote and cloud LLM backends."""

import warnings

# cryptography 51 deprecates DSA, which asyncssh still names when imported: a warning on
# every start that the operator can do nothing about (the gateway never uses DSA keys).
warnings.filterwarnings("ignore", message="DSA is deprecated", module="asyncssh")
