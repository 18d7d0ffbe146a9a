"""bench/run --backup's S3-compatible server: moto's (PyPI moto[server], in .build/moto-venv),
in this process on 127.0.0.1:PORT, with SigV4 verification on. Its first requests make an IAM
user with an allow-all policy and an access key (moto checks signatures only after
INITIAL_NO_AUTH_ACTION_COUNT requests); every later request must be signed with that key.
Writes "ACCESS_KEY SECRET_KEY" to KEYS_FILE (the server's own output goes to stdout/stderr), then
serves until it is killed.

    .build/moto-venv/bin/python bench/s3server.py PORT KEYS_FILE
"""
import json
import os
import sys
import time

os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"

import boto3  # noqa: E402  (moto reads the variable when it is imported)
from moto.server import ThreadedMotoServer  # noqa: E402

port = int(sys.argv[1])
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
server.start()
endpoint = f"http://127.0.0.1:{port}"
iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="cairn")
iam.put_user_policy(UserName="cairn", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="cairn")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
s3.create_bucket(Bucket="cairn-bench")
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(key["AccessKeyId"] + " " + key["SecretAccessKey"] + "\n")
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
while True:
    time.sleep(3600)
