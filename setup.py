"""imcl_tf: multi-label image classifiers from partial labels (IMCL, CVPR 2020) on TensorFlow."""

from setuptools import find_packages, setup

# Pinned as decided in the architecture (BUILD.md explains every choice).
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",  # the full wheel: tensorflow-serving-api depends on it, not on tensorflow-cpu
    "keras==3.15.1",
    "tensorboard==2.21.0",  # no longer pulled in by TF; keras.callbacks.TensorBoard needs it
    "tensorflow-serving-api==2.21.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "grpcio",  # version resolved by tensorflow / tensorflow-serving-api
    "protobuf",  # version resolved by tensorflow
    "pillow",  # image encoding for converters and the demo dataset
    "matplotlib",  # PNG charts (frequency groups, mAP curves)
]

setup(
    name="imcl_tf",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.14",
    packages=find_packages(include=["imcl_tf", "imcl_tf.*", "tfrecords_tools", "tfrecords_tools.*",
                                    "serving", "serving.*"]),
    package_data={"serving": ["*.config", "*.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
    },
)
