'use strict';
/*
 * A VMShop client in Node.js, on the npm "soap" package (pinned in package.json), which reads
 * wsdl/vmshop.wsdl at start and builds its calls from it.
 *
 *   node vmshop_client.js URL DAG_FILE VM_KEY QUERY BAD_DAG_FILE...
 *
 * creates a VM from DAG_FILE with the key VM_KEY, finds it with QUERY, describes it through the endpoint
 * reference the shop answered, collects it, and then asks for a VM from each BAD_DAG_FILE, each of which
 * must come back as a SOAP fault. For an https URL it verifies the shop against the CA in $VMSHOP_CA and, when $VMSHOP_CERT and
 * $VMSHOP_KEY are set, proves its identity with that certificate and key.
 *
 * Every fact it learns is one line "STEP FIELD VALUE" on stdout (newlines in a value are written as \n),
 * for tests/test_generated_clients.py to check. Exit status: 0 when every step went as described, 1
 * otherwise (with the reason on stderr).
 */
const fs = require('fs');
const path = require('path');
const soap = require('soap');

const WSDL = path.resolve(__dirname, '..', '..', '..', 'wsdl', 'vmshop.wsdl');
const TIMEOUT_MS = 120000;

function put(step, field, value) {
  const text = value === undefined || value === null ? '(none)' : String(value);
  process.stdout.write(`${step} ${field} ${text.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}\n`);
}

function putVm(step, vm) {
  for (const field of ['vm_id', 'state', 'owner', 'plant', 'memory']) {
    put(step, field, vm[field]);
  }
}

/** A repeated element: the soap package gives a list, one object, or nothing, as the reply had it. */
function list(value) {
  return value === undefined || value === null ? [] : [].concat(value);
}

async function connect(url) {
  // preserveWhitespace: the soap package trims text by default, and an action's output ends in a newline.
  const client = await soap.createClientAsync(WSDL, { preserveWhitespace: true });
  client.setEndpoint(url);
  if (url.startsWith('https:')) {
    const { VMSHOP_CA: ca, VMSHOP_CERT: cert, VMSHOP_KEY: key } = process.env;
    if (!ca) {
      throw new Error('an https URL needs VMSHOP_CA (the CA that signed the shop)');
    }
    // Node's TLS verifies the shop's certificate and host name against this CA (rejectUnauthorized).
    client.setSecurity(new soap.ClientSSLSecurity(key || null, cert || null, ca, { rejectUnauthorized: true }));
  }
  return client;
}

async function main(argv) {
  if (argv.length < 5) {
    process.stderr.write('usage: node vmshop_client.js URL DAG_FILE VM_KEY QUERY BAD_DAG_FILE...\n');
    return 2;
  }
  const [url, dagFile, vmKey, query, ...badDagFiles] = argv;
  const client = await connect(url);
  const options = { timeout: TIMEOUT_MS };

  const [created] = await client.createVMAsync({ dag: fs.readFileSync(dagFile, 'utf8'), vm_key: vmKey }, options);
  const vm = created.createVMResult.vm;
  putVm('create', vm);
  for (const run of list(created.createVMResult.runs)) {
    put('create', 'run', run.node);
    put('create', 'output', run.output);
  }
  const epr = { Address: vm.epr.Address, VMKey: vm.epr.VMKey };
  put('create', 'epr_address', epr.Address);
  put('create', 'epr_key', epr.VMKey);

  const [found] = await client.queryVMsAsync({ query }, options);
  const vms = list(found && found.queryVMsResult);
  put('query', 'count', vms.length);
  for (const each of vms) {
    put('query', 'vm_id', each.vm_id);
  }

  const [described] = await client.describeVMAsync({ vm: epr }, options);
  putVm('describe', described.describeVMResult);
  const [collected] = await client.collectVMAsync({ vm: epr }, options);
  putVm('collect', collected.collectVMResult);

  for (const badDagFile of badDagFiles) {
    put('fault', 'dag', badDagFile);
    const fault = await faultOf(client.createVMAsync({ dag: fs.readFileSync(badDagFile, 'utf8') }, options));
    if (!fault) {
      process.stderr.write(`vmshop_client.js: the bad DAG ${badDagFile} was accepted\n`);
      return 1;
    }
    put('fault', 'code', fault.faultcode);
    put('fault', 'string', fault.faultstring);
  }
  return 0;
}

/** The SOAP fault a call ended with (null if it succeeded); any other error is thrown on. */
async function faultOf(call) {
  try {
    await call;
  } catch (error) {
    const body = error.root && error.root.Envelope && error.root.Envelope.Body;
    if (body && body.Fault) {
      return body.Fault;
    }
    throw error;
  }
  return null;
}

main(process.argv.slice(2)).then(
  (status) => { process.exitCode = status; },
  (error) => {
    process.stderr.write(`vmshop_client.js: ${error.stack || error}\n`);
    process.exitCode = 1;
  });
