// The AWS SDK for JavaScript v3 (@aws-sdk/client-kms) against hsmkms, run by
// tests/test_sdk_compat.py with node: HSMKMS_ENDPOINT, the AWS_* credentials and region in the
// environment; HSMKMS_SIGN=1 when the server has asymmetric signing keys. Prints one JSON
// object of facts (what each call returned, and each error's class and name) for the Python
// test to check; exits 1 only when the script itself breaks.
import {
  CreateKeyCommand,
  DecryptCommand,
  DescribeKeyCommand,
  DisableKeyCommand,
  DisabledException,
  EncryptCommand,
  GenerateDataKeyCommand,
  InvalidCiphertextException,
  KMSClient,
  KMSInvalidSignatureException,
  KMSServiceException,
  NotFoundException,
  SignCommand,
  VerifyCommand,
} from "@aws-sdk/client-kms";

const endpoint = process.env.HSMKMS_ENDPOINT;
const region = process.env.AWS_REGION;
const client = new KMSClient({ endpoint, region, maxAttempts: 1 });
const facts = {};

// The class the SDK raised, its name and HTTP status (never the message's wording).
async function failure(command, klass, on = client) {
  try {
    await on.send(command);
    return { raised: false };
  } catch (err) {
    return {
      raised: true,
      name: err.name,
      typed: err instanceof klass,
      service: err instanceof KMSServiceException,
      status: err.$metadata?.httpStatusCode,
    };
  }
}

const equal = (a, b) => Buffer.from(a).equals(Buffer.from(b));

const created = await client.send(new CreateKeyCommand({ Description: "from the JS SDK v3" }));
const keyId = created.KeyMetadata.KeyId;
facts.keySpec = created.KeyMetadata.KeySpec;
facts.keyState = created.KeyMetadata.KeyState;

const context = { tenant: "js", purpose: "compat" };
const plaintext = Buffer.from("hello from @aws-sdk/client-kms");
const encrypted = await client.send(
  new EncryptCommand({ KeyId: keyId, Plaintext: plaintext, EncryptionContext: context }),
);
facts.encryptKeyId = encrypted.KeyId;
const decrypted = await client.send(
  new DecryptCommand({ CiphertextBlob: encrypted.CiphertextBlob, EncryptionContext: context }),
);
facts.roundTrip = equal(decrypted.Plaintext, plaintext);
facts.decryptKeyId = decrypted.KeyId;
facts.wrongContext = await failure(
  new DecryptCommand({
    CiphertextBlob: encrypted.CiphertextBlob,
    EncryptionContext: { tenant: "other", purpose: "compat" },
  }),
  InvalidCiphertextException,
);

const dataKey = await client.send(
  new GenerateDataKeyCommand({ KeyId: keyId, KeySpec: "AES_256", EncryptionContext: context }),
);
facts.dataKeyLength = dataKey.Plaintext.length;
const unwrapped = await client.send(
  new DecryptCommand({ CiphertextBlob: dataKey.CiphertextBlob, EncryptionContext: context }),
);
facts.dataKeyUnwraps = equal(unwrapped.Plaintext, dataKey.Plaintext);

facts.missingKey = await failure(
  new DescribeKeyCommand({ KeyId: "alias/does-not-exist" }),
  NotFoundException,
);
await client.send(new DisableKeyCommand({ KeyId: keyId }));
facts.disabledKey = await failure(
  new EncryptCommand({ KeyId: keyId, Plaintext: plaintext }),
  DisabledException,
);

const forged = new KMSClient({
  endpoint,
  region,
  maxAttempts: 1,
  credentials: {
    accessKeyId: process.env.AWS_ACCESS_KEY_ID,
    secretAccessKey: "not-the-secret-of-this-access-key-id",
  },
});
facts.wrongSecret = await failure(new DescribeKeyCommand({ KeyId: keyId }), Error, forged);

if (process.env.HSMKMS_SIGN === "1") {
  const signing = await client.send(
    new CreateKeyCommand({ KeySpec: "ECC_NIST_P256", KeyUsage: "SIGN_VERIFY" }),
  );
  const signKeyId = signing.KeyMetadata.KeyId;
  const message = Buffer.from("signed by the JS SDK");
  const signed = await client.send(
    new SignCommand({
      KeyId: signKeyId,
      Message: message,
      MessageType: "RAW",
      SigningAlgorithm: "ECDSA_SHA_256",
    }),
  );
  const verified = await client.send(
    new VerifyCommand({
      KeyId: signKeyId,
      Message: message,
      MessageType: "RAW",
      Signature: signed.Signature,
      SigningAlgorithm: "ECDSA_SHA_256",
    }),
  );
  facts.signatureValid = verified.SignatureValid;
  facts.badSignature = await failure(
    new VerifyCommand({
      KeyId: signKeyId,
      Message: Buffer.from("another message"),
      MessageType: "RAW",
      Signature: signed.Signature,
      SigningAlgorithm: "ECDSA_SHA_256",
    }),
    KMSInvalidSignatureException,
  );
}

process.stdout.write(JSON.stringify(facts) + "\n");
