"""t5x_lite: T5-style encoder-decoder and Llama-style decoder-only transformers in JAX/Flax."""

import setuptools

setuptools.setup(
    name='t5x_lite',
    version='0.1.0',
    description='A small, readable JAX/Flax codebase for T5 and decoder-only transformers.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['t5x_lite', 't5x_lite.*']),
    package_data={'t5x_lite': ['data/corpora/**/*', 'data/vocabs/*']},
    include_package_data=True,
    install_requires=[
        'jax>=0.4.35',
        'flax>=0.10.2',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.10',
        'etils[epath]',  # workdir I/O (local or gs://)
        'ml-collections>=0.1.1',
        'absl-py>=2.1',
        'tensorflow-datasets>=4.9.7',  # array_record builders + tfds.data_source; no TensorFlow
        'grain>=0.2.2',
        'sentencepiece>=0.2.0',
        'sacrebleu>=2.4',
        'rouge-score>=0.1.2',
        'tensorboardX>=2.6',
        'tqdm>=4.66',
        'matplotlib>=3.8',
        'numpy>=1.26',
        'safetensors>=0.4.5',  # Hugging Face checkpoint import/export
    ],
    extras_require={
        # torch is pinned to the CPU wheel available locally; a range would pull CUDA builds.
        'test': ['pytest>=8', 'torch==2.13.0', 'transformers>=5.0'],
        'tpu': ['jax[tpu]>=0.4.35'],
        'gpu': ['jax[cuda12]>=0.4.35'],
    },
    entry_points={'console_scripts': ['t5x_lite=t5x_lite.main:console']},
)
