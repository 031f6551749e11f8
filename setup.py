from setuptools import find_packages, setup

setup(
    name="surfshard",
    version="0.1.0",
    description="A sharded, fault-tolerant SurfStore metadata service on Raft and Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["raft*", "surfshard*", "shardmaster*", "client*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/*.py"], "surfshard": ["data/*"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=23.10.0",
        "pyopenssl>=23.2.0",
        "service-identity>=23.1.0",
        "cryptography>=41.0.0",
        "cbor2>=5.6.0",
        "zope.interface>=6.0",
        "rich>=13.0",
        "prometheus-client>=0.20",
        "pathspec>=0.12",
        "watchdog>=4.0",
    ],
    extras_require={
        "test": ["hypothesis>=6.90.0", "ruff>=0.5.0", "mypy>=1.10", "mypy-zope>=1.0.5"],
        "bench": ["pysyncobj>=0.3.12", "msgspec>=0.18"],
    },
    entry_points={"console_scripts": ["surfshard = client.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
    ],
)
