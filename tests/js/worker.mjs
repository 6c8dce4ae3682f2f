// Workers on the official Conductor JavaScript SDK, for Baton's tests.
//
// Usage: node worker.mjs <taskType>=<behaviour> [<taskType>=<behaviour> ...]
//
// The SDK itself reads its configuration from the environment, as it does
// for any user: CONDUCTOR_SERVER_URL (the base URL, without /api),
// CONDUCTOR_AUTH_KEY with CONDUCTOR_AUTH_SECRET when the server has
// authentication on, CONDUCTOR_LOG_LEVEL. Nothing else configures this
// script.
//
// Behaviours:
//   add-one  completes with {value: value + 1, seen: [...seen, ref], pid}
//   refuse   throws NonRetryableException: FAILED_WITH_TERMINAL_ERROR
//   flaky    throws an Error on the first attempt (FAILED), then completes
//            with {value, attempt}
//
// Prints "ready" once its workers poll; stops on SIGTERM or SIGINT.

import {
  NonRetryableException,
  OrkesClients,
  TaskHandler,
} from "@io-orkes/conductor-javascript";

const BEHAVIOURS = {
  "add-one": async (task) => ({
    status: "COMPLETED",
    outputData: {
      value: task.inputData.value + 1,
      seen: [...(task.inputData.seen ?? []), task.referenceTaskName],
      pid: process.pid,
    },
  }),
  refuse: async () => {
    throw new NonRetryableException("this input can never work");
  },
  flaky: async (task) => {
    if ((task.retryCount ?? 0) === 0) {
      throw new Error("transient failure");
    }
    return {
      status: "COMPLETED",
      outputData: { value: task.inputData.value, attempt: task.retryCount },
    };
  },
};

function usage(message) {
  console.error(`${message}
usage: node worker.mjs <taskType>=<behaviour> [...]
behaviours: ${Object.keys(BEHAVIOURS).join(", ")}`);
  process.exit(2);
}

function parseWorkers(args) {
  if (args.length === 0) {
    usage("no workers given");
  }
  return args.map((arg) => {
    const separator = arg.lastIndexOf("=");
    const taskDefName = arg.slice(0, separator);
    const behaviour = arg.slice(separator + 1);
    if (separator <= 0 || !Object.hasOwn(BEHAVIOURS, behaviour)) {
      usage(`not a <taskType>=<behaviour> pair: ${arg}`);
    }
    // The SDK's own defaults, set on purpose: TaskHandler passes a worker's
    // unset concurrency and pollInterval to its TaskRunner as undefined,
    // which overrides the runner's defaults.
    return {
      taskDefName,
      execute: BEHAVIOURS[behaviour],
      concurrency: 1,
      pollInterval: 100,
    };
  });
}

const workers = parseWorkers(process.argv.slice(2));
const clients = await OrkesClients.from();
const handler = new TaskHandler({
  client: clients.getClient(),
  workers,
  scanForDecorated: false,
});

// Registered before the first poll so that a test stopping the process
// early still gets a clean exit instead of Node's default SIGTERM death.
let stopping = false;
const stop = async () => {
  if (stopping) {
    return;
  }
  stopping = true;
  await handler.stopWorkers();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

await handler.startWorkers();
console.log("ready");
