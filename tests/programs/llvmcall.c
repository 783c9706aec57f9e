/* A program that spends its time inside libLLVM (built without frame
 * pointers, like Debian's libLLVM-14): each round builds a function of many
 * blocks through the C API, verifies the module and prints it to a string.
 * Prints "ready" once running; runs for argv[1] seconds (default: forever). */
#include <llvm-c/Analysis.h>
#include <llvm-c/Core.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void round_trip(int blocks)
{
    LLVMContextRef ctx = LLVMContextCreate();
    LLVMModuleRef mod = LLVMModuleCreateWithNameInContext("m", ctx);
    LLVMTypeRef i32 = LLVMInt32TypeInContext(ctx);
    LLVMTypeRef params[] = {i32, i32};
    LLVMValueRef fn = LLVMAddFunction(mod, "f", LLVMFunctionType(i32, params, 2, 0));
    LLVMBuilderRef b = LLVMCreateBuilderInContext(ctx);
    LLVMValueRef acc = LLVMGetParam(fn, 0);
    for (int i = 0; i < blocks; i++) {
        LLVMBasicBlockRef bb = LLVMAppendBasicBlockInContext(ctx, fn, "bb");
        if (i)
            LLVMBuildBr(b, bb);
        LLVMPositionBuilderAtEnd(b, bb);
        acc = LLVMBuildAdd(b, acc, LLVMGetParam(fn, 1), "a");
        acc = LLVMBuildMul(b, acc, LLVMConstInt(i32, 3, 0), "m");
    }
    LLVMBuildRet(b, acc);
    LLVMVerifyModule(mod, LLVMReturnStatusAction, NULL);
    LLVMDisposeMessage(LLVMPrintModuleToString(mod));
    LLVMDisposeBuilder(b);
    LLVMDisposeModule(mod);
    LLVMContextDispose(ctx);
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 1e9;
    double end = now() + seconds;
    printf("ready\n");
    fflush(stdout);
    while (now() < end)
        round_trip(200);
    return 0;
}
