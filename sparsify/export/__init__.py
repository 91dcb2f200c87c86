"""Export for inference: a trained sparse model, shrunk, to ONNX (+ .pt2, a report and, for a
Hugging Face model, its save_pretrained folder), checked against the trained model.

One module per job: :mod:`~sparsify.export.pipeline` (the steps of ``export()`` in order),
:mod:`~sparsify.export.onnx_file` (writing the files and the parity checks),
:mod:`~sparsify.export.huggingface` (config rewrite and save_pretrained),
:mod:`~sparsify.export.latency` (onnxruntime timing against the dense export),
:mod:`~sparsify.export.report` (the printed summary), :mod:`~sparsify.export.options`
(the policy's export section, typed) and :mod:`~sparsify.export.run` (loading a
training run and exporting it, ``sparsify export RUN``).
"""
