"""Human feedback: sample pairs (`prefalign pairs`), label them in a local web app
(`prefalign label`), export preferences (`prefalign label export`) for reward and DPO training."""
